"""Suite-wide setup. Without a GPU, Triton kernels run on its CPU interpreter, which must be
switched on before triton is first imported (so here, at collection start)."""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
