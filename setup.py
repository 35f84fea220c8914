"""cxr-transfer: distributed transfer learning for chest X-rays on CPU clusters."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name="requirements.txt"):
    # One place for pins: requirements.txt (also what `make setup` installs), and the optional extras' files.
    # Build-only and test-only tools are not run-time needs; pip options (-c FILE) are not requirements.
    skip = {"setuptools", "wheel", "pytest", "cffi"}
    out = []
    for line in (HERE / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-") and \
                line.split("=")[0].split("<")[0].split(">")[0].strip().lower() not in skip:
            out.append(line)
    return out


setup(
    name="cxr-transfer",
    version="0.1.0",
    description="Horovod data-parallel fine-tuning of ImageNet CNNs on NIH ChestX-ray14, on CPU clusters",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["data_prep*", "distributed*", "launch*", "benchmarks*"]),
    package_data={"launch": ["*.sbatch"]},
    install_requires=requirements(),
    extras_require={"horovod": ["horovod==0.28.1"], "tracking": requirements("requirements-tracking.txt")},
    entry_points={
        "console_scripts": [
            "cxr-prep=data_prep.__main__:main",
            "cxr-synth=data_prep.synthetic:main",
            "cxr-train=distributed.train:main",
            "cxr-eval=distributed.evaluate:main",
            "cxr-predict=distributed.predict:main",
            "cxr-export=distributed.export:main",
            "cxr-launch=launch.__main__:main",
            "cxr-bench=benchmarks.__main__:main",
        ]
    },
)
