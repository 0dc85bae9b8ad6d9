"""Data: raw readers, the synthetic planted-modality domain, processed datasets and images."""
