"""Building vitlab's C++ sources (``vitlab/csrc``) into shared libraries, once per source and machine.

A library is compiled on first use with the machine's C++ compiler ($CXX, else g++, else c++) and kept
in a cache folder: $VITLAB_CACHE_DIR, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab, and the temp
dir where that cannot be written. Its file name carries a hash of everything that decides its code (the
source, the compiler, the flags, the CPU it is tuned for, and any ``key`` the caller adds), so a change
to any of them builds a new file and an old one is never loaded by mistake.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where built libraries are kept: $VITLAB_CACHE_DIR, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab."""
    if os.environ.get("VITLAB_CACHE_DIR"):
        return Path(os.environ["VITLAB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


def compiler() -> str | None:
    """The C++ compiler to build with ($CXX, else g++, else c++), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cpu_key() -> str:
    """What -march=native compiles for: the CPU's flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def torch_flags() -> tuple[str, ...]:
    """The compiler flags that build against the installed PyTorch: its headers, its libraries' folder
    (also as the run-time search path) and its C++ ABI."""
    torch_dir = Path(torch.__file__).parent
    lib_dir = torch_dir / "lib"
    flags = (f"-I{torch_dir / 'include'}", f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}")
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return flags + ((f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}",) if abi is not None else ())


def torch_key() -> str:
    """The installed PyTorch's version and commit: a library built against it is rebuilt when it changes."""
    return f"torch {torch.__version__} {getattr(torch.version, 'git_version', '')}"


def shared_library(
    source: Path, stem: str, flags: tuple[str, ...], key: str = "", libraries: tuple[str, ...] = ()
) -> Path:
    """-> the path of ``source`` compiled with ``flags`` (which must make a shared library), built if it is
    not in the cache yet. ``libraries`` (-l options) follow the source on the command line, where linkers
    that drop unneeded libraries want them. ``stem`` starts the file's name; ``key`` is whatever else
    decides the code (a library's version, say). Raises RuntimeError naming the compiler's complaint where
    the build fails."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    digest = hashlib.sha256(
        "\0".join([source.read_text(), cxx, *flags, *libraries, key, cpu_key(), platform.machine()]).encode()
    ).hexdigest()[:16]
    user = getattr(os, "getuid", lambda: "user")()
    for folder in (cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"vitlab-kernels-{user}"):
        target = folder / f"{stem}_{digest}.so"
        if target.exists():
            return target
        # Built under a temporary name and renamed into place: a reader never sees half a file.
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:  # a folder that cannot be written to: the next one
            continue
        os.close(fd)
        try:
            run = subprocess.run([cxx, *flags, str(source), *libraries, "-o", partial], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{cxx} failed to build {source.name}:\n{run.stderr.strip()}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return target
    raise RuntimeError(f"no writable folder for the built library (tried {cache_dir() / 'kernels'} and the temp dir)")
