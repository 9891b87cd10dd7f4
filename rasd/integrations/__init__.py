"""rasd inside serving engines. Each integration is an optional extra and imports its engine lazily:

- :mod:`rasd.integrations.vllm`: ``RasdProposer``, a vLLM v1 speculative proposer
  (``pip install 'rasd[vllm]'``).
"""
