"""The experiment behind ``make run``: do the bio mechanisms learn faster, predict better and
resist gradient inversion? (``python -m bio_transformations.experiments --help``.)

Needs the ``experiment`` extra (numpy, scipy, scikit-learn, matplotlib, tqdm, mnist1d), which
only this subpackage imports; the library itself does not import it.

Modules: :mod:`.data` (MNIST-1D, digits, MNIST and CIFAR-10 readers), :mod:`.models` (networks
and variants), :mod:`.training` (the training loop and its bio calls), :mod:`.inversion`
(gradient-inversion attacks and the threat model), :mod:`.report` (statistics, tables,
figures), :mod:`.cli` (the command line).
"""
