"""The 15 corruption names of Tiny-ImageNet-C (Hendrycks & Dietterich 2019), in its order: the degradation classes.

Apart from `factory.corruptions` (which re-exports them) so that the manifests' schema, and every command that reads
manifests (verify, query, stats, filter), can name the label columns without importing torch.
"""

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
