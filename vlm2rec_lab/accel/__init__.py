"""Speed as an opt-in layer beside the method: packing, fused stand-ins, varlen attention,
compiling and out-of-memory recovery, prefetching, host-to-device copies and several processes.
Each part is switched by :class:`~vlm2rec_lab.config.SpeedConfig`; with every switch off the
plain Hugging Face forward runs."""
