"""Models: the host adapter (`DiffusionBackend`) that the sampler and trainer see, the diffusers
model folders behind it, and the tiny random model of the tests."""
