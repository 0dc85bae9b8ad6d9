"""Speed as an opt-in layer beside the method: packing, fused stand-ins, varlen attention,
compiling and out-of-memory recovery, prefetching, host-to-device copies, Task 2's chunked
softmax cross-entropy and several processes. The embedding path's parts (packing, shared prefixes,
stand-ins, merged adapters, the vision cache, compiling, checkpointing, prefetching) are switched
by :class:`~vlm2rec_lab.config.SpeedConfig`; with every switch off the plain Hugging Face forward
runs."""
