"""Python launchers of the CUDA C++ kernels in csrc/ (bound as ``mslora_kernels._C``).

Each launcher checks device, dtype, shape and contiguity in Python, allocates outputs and
workspaces with torch, calls the raw-pointer binding on the current CUDA stream and raises with
the CUDA runtime's message if the launch reports an error. Importing this package never needs
the extension or a GPU; calling a launcher without the extension raises a clear RuntimeError.
"""
