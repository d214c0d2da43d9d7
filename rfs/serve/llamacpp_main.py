"""`python -m rfs.serve.llamacpp_main …`: llama-cpp-python's OpenAI server, without ggml's extra
CPU buffer types.

ggml repacks weights into "extra" buffer types for its fastest CPU kernels; on a CPU with AMX
(Sapphire Rapids and later) that selects its AMX matmul, which segfaults the server on its first
request (llama-cpp-python 0.3.36, seen on the development VM). llama-cpp-python's server cannot
turn them off, so this entry point sets `use_extra_bufts = False` in the model parameters every
load starts from, then runs the server unchanged with the same arguments.
"""

import runpy

import llama_cpp.llama_cpp as lib

_defaults = lib.llama_model_default_params


def _model_params():  # type: ignore[no-untyped-def]
    params = _defaults()
    params.use_extra_bufts = False
    return params


lib.llama_model_default_params = _model_params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
