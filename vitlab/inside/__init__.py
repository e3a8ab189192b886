"""Looking inside a ViT: the recorder, what to compute from a recording (rollout, attention distance,
position similarity), and converting timm, torchvision and Hugging Face ViTs to vitlab's."""
