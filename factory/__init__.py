"""factory: an offline dataset factory for blind image super-resolution.

Undertrained image reconstruction models degrade bicubic LR images (Ito et al., "Undertrained Image Reconstruction
for Realistic Degradation in Blind Image Super-Resolution"); the (degraded LR, HR) pairs are written to WebDataset
shards with Parquet manifests that record each pair's provenance, colour difference and degradation label.
"""

__version__ = "0.1.0"
