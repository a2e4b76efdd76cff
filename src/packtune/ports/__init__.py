"""Native ports of remote-code families: InternLM 1/2, Baichuan 1/2, ChatGLM2/3 and Qwen-1.

A checkpoint of one of these families loads as a native transformers class (llama, glm,
qwen2, or packtune's own ``baichuan_alibi``) with converted weights, runs with
``"packtune_varlen"`` like every other family, and saves back in its original layout:
``packtune.load_model`` / ``packtune.save_model`` (``packtune.ports.api``). Which family a
``config.json`` is: ``packtune.ports.detect``; each family's config and tensor map: one module
each (``internlm``, ``internlm2``, ``baichuan``, ``chatglm``, ``qwen``); their tokenizers, built
from the checkpoint's data files without its remote code: ``family_tokenizers``.
"""
