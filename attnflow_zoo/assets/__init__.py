"""Package data shipped with attnflow_zoo: ``digits.npz``, the embedded dataset ``digits``
(5,000 real MNIST digits, 28×28 uint8, a fixed stratified 4,000 / 1,000 train / test split; its
terms are in ``dataset_license/digits.md``)."""
