"""TF-IDF weighting and row L2 normalisation of sparse feature rows, shared by every place that builds BoW inputs
(the XC BoW feature transform, bags of words built from text, label texts, the synthetic generator)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def doc_freq(X: sp.csr_matrix) -> np.ndarray:
    """float64 number of rows of ``X`` holding each column (rows without repeated columns assumed)."""
    return np.bincount(X.indices, minlength=X.shape[1]).astype(np.float64)


def smooth_idf(df, num_docs) -> np.ndarray:
    """float64 ``log((1 + N) / (1 + df)) + 1`` for document frequencies ``df`` among N = ``num_docs`` rows."""
    return np.log((1.0 + num_docs) / (1.0 + np.asarray(df, dtype=np.float64))) + 1.0


def weighted(X, idf=None, log_tf=False, dtype=np.float32) -> sp.csr_matrix:
    """CSR (in ``dtype``) of ``X``'s rows with each value v replaced by ``(1 + log v if log_tf else v) * idf[column]``
    (no idf: no factor). Entries that become exactly 0 are dropped."""
    X = sp.csr_matrix(X, dtype=dtype, copy=True)
    if log_tf:
        X.data = 1.0 + np.log(X.data)
    if idf is not None:
        X = sp.csr_matrix(X @ sp.diags(np.asarray(idf, dtype=dtype)))
    return X


def tfidf_l2(X, idf=None, log_tf=False, dtype=np.float32) -> sp.csr_matrix:
    """float32 CSR of :func:`weighted` rows, each divided by its L2 norm (all-zero rows stay zero); the arithmetic
    runs in ``dtype``."""
    X = weighted(X, idf, log_tf, dtype)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags((1.0 / norms).astype(dtype)) @ X, dtype=np.float32)
