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
        "torch>=2.6",
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
        "search": ["flask>=3", "waitress>=3", "transformers>=4.56"],
        "search-test": ["requests", "selenium>=4.20"],
        "faiss": ["faiss-cpu"],
    },
)
