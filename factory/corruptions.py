"""The 15 corruptions of Tiny-ImageNet-C (Hendrycks & Dietterich 2019), the degradation classes of the paper's
diversity analysis (Section 4.3.1). (Implementation lands with the classifier issue.)"""

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
