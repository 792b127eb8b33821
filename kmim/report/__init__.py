"""``kmim report``: a static, self-contained HTML report of a dataset's tokenizer (codebook gallery, token maps,
usage, TCAS, token-by-class matrix, k-means curve), built from a bounded scan of the dataset."""

from kmim.report.build import build_report
from kmim.report.dataset import ReportError

__all__ = ["ReportError", "build_report"]
