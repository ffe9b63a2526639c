import os

# Must run before anything imports triton: triton reads TRITON_INTERPRET when @triton.jit decorates a kernel,
# so setting it here makes the kernels' CPU tests run the real Triton kernels through the interpreter.
os.environ["TRITON_INTERPRET"] = "1"
