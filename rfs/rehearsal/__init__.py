"""STAND-INS for `rfs rehearse` (and the tests): the scripted researcher, a stand-in `vllm`
executable serving it, stand-in jobs that sleep and print a harness summary, and a tiny model.
Nothing here runs in a real experiment."""
