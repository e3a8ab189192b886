"""The notebooks' helpers: plots, the small widgets of the lessons, and the attention explorer."""
