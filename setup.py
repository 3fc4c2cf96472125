"""glare-nat: GLARE (ECCV 2024) + NAT refiner as a BasicSR 1.4.2 plugin.

Installs exactly three packages: glare_nat_arch, glare_nat_models, glare_nat_data. The repo-root
``basicsr/`` folder holds launchers only and must never be packaged (it would overwrite
``site-packages/basicsr/train.py``).

Install order matters (see Makefile / README): torch first, then basicsr without build isolation,
then this project (``pip install --no-build-isolation -e .``).
"""

from setuptools import setup

setup(
    name="glare-nat",
    version="0.1.0",
    description="GLARE low-light enhancement with a non-autoregressive transformer refiner, as a BasicSR plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["glare_nat_arch", "glare_nat_models", "glare_nat_data"],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "basicsr==1.4.2",
        "mmengine>=0.10",
        "lpips>=0.1.4",
        "opencv-python",
        "pyyaml",
        "einops",
        "tqdm",
        "scikit-image",
        "numpy",
        "scipy",
    ],
    extras_require={"dev": ["pytest", "ruff", "import-linter"]},
    entry_points={
        "console_scripts": [
            "glare-nat-enhance=glare_nat_models.enhance_cli:main",
            "glare-nat-benchmark=glare_nat_models.benchmark:main",
        ]
    },
)
