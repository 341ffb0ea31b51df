"""kdarch.parallel: scale-out on PyTorch's own distributed stack, kept apart from the model.

The model never knows how it is parallelised: a plan (data-parallel replication and FSDP2 sharding, expert
parallelism, pipeline stages) is applied to a built `CausalLM` from outside, over one `DeviceMesh`, and
`kdarch plan` estimates the same plans on paper for clusters the tests cannot reach.
"""
