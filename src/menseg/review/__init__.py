"""``menseg review``: look at every prediction in the browser, flag the bad ones, keep the decisions.

- :mod:`~menseg.review.cases`: which cases, with images, reference, metrics, volumes, lesions;
- :mod:`~menseg.review.display`: volumes as the page draws them (8-bit, decimated when large);
- :mod:`~menseg.review.site`: the pages' data, served or written as a static folder;
- :mod:`~menseg.review.server`: the local server (127.0.0.1 only) and its one write, the verdicts;
- :mod:`~menseg.review.verdicts`: ``PRED/review.csv``.
"""
