from setuptools import find_packages, setup

setup(
    name="magicanimate",
    version="0.1.0",
    description="Animate a reference photo with a DensePose motion sequence: MagicAnimate on current diffusers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["magicanimate", "magicanimate.*"]) + ["magicanimate.configs"],
    package_dir={"magicanimate.configs": "configs"},
    package_data={"magicanimate.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.1",  # not pinned: install the build for your machine first (CUDA, ROCm or CPU)
        "diffusers>=0.42,<0.43",
        "transformers>=4.46",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "omegaconf>=2.3",
        "av>=14",
        "numpy>=1.24",
        "pillow>=10,<13",
        "tqdm",
    ],
    extras_require={
        # The demo tests: gradio_client for the API, Playwright driving the system Chromium (no browser download).
        "test": ["pytest>=8", "gradio>=6.31,<7", "gradio_client>=2.7", "playwright>=1.50", "opencv-python-headless"],
        # The DensePose TorchScript export calls torchvision ops; torchvision needs a matching torch build.
        "densepose": ["torchvision", "opencv-python-headless"],
        "demo": ["gradio>=6,<7"],
    },
    entry_points={"console_scripts": ["magicanimate=magicanimate.cli:main"]},
)
