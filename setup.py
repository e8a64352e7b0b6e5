from setuptools import find_packages, setup

setup(
    name="conquer",
    version="0.1.0",
    description="CONQUER: contextual query-aware ranking for video corpus moment retrieval (ACM MM 2021)",
    packages=find_packages(include=["config", "method", "utils", "config.*", "method.*", "utils.*"]),
    py_modules=["train", "inference"],
    package_data={"config": ["*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "lmdb",
        "msgpack",
        "msgpack-numpy",
        "easydict",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest"],
        "corpus": ["transformers>=4.56", "h5py"],
        "extract": ["av>=14", "transformers>=4.56"],
        "faiss": ["faiss-cpu"],
    },
)
