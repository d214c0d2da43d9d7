"""`python -m rfs.serve.llamacpp_main …`: llama-cpp-python's OpenAI server, unchanged and with the
same arguments, but without ggml's extra CPU buffer types (rfs/serve/no_extra_buffers.py says why)."""

import runpy

from rfs.serve import no_extra_buffers

no_extra_buffers.apply()
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
