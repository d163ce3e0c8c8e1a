"""Post-install check run by `make install`: on a machine without a GPU driver the
environment must hold a CPU build of torch and no CUDA wheels (they are gigabytes)."""
import importlib.metadata as md
import shutil
import sys

import torch

if shutil.which("nvidia-smi") is None:
    cuda_pkgs = sorted(d.metadata["Name"] for d in md.distributions()
                       if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    if cuda_pkgs or torch.version.cuda is not None:
        sys.exit(f"error: CPU machine but the install pulled CUDA packages: torch {torch.__version__} "
                 f"(cuda {torch.version.cuda}), {cuda_pkgs}. Pin TORCH_SPEC to a CPU wheel.")
print(f"install ok: torch {torch.__version__}, python {sys.version.split()[0]}")
