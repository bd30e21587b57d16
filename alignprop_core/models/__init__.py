"""Models: the host adapter (`DiffusionBackend`) that the sampler and trainer see, the diffusers
model folders behind it (SD1.x, SD3/SD3.5 and FLUX.1; `loading.load_backend` picks the family from
model_index.json), and the tiny random models of the tests."""
