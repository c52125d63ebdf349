"""Topic clusters for expert partitions, c-BTM style: TF-IDF -> SVD -> L2-normalised features ->
balanced k-means (scikit-learn), deterministic by seed.

Why balanced: plain k-means on TF-IDF of the embedded stdlib corpus put 595,292 of 599,039 training
tokens in one of 4 clusters (the other three held 1,724, 393 and 1,630 tokens: a few odd documents),
so three "experts" would have trained 100+ epochs on a page of text. c-BTM (Gururangan et al. 2023)
clusters SVD-reduced, normalised TF-IDF with *balanced* k-means for the same reason; here a cluster may
hold at most ``1 + balance_slack`` times its equal share of the training **bytes** (experts train equal
steps, so equal data is what keeps them comparable). ``balance_slack=None`` is plain k-means.

The model is fitted on a bounded sample of training documents, given in a fixed order (sorted by
their seeded key), so the same corpus and seed give the same clusters. It remembers the balanced
label of every document it was fitted on (by a hash of its text); any other document (held-out
text, or training documents beyond the sample) goes to its nearest centroid, as at c-BTM inference.
Labelling happens inside the Ray tokenizer actors.
"""

from __future__ import annotations

import hashlib

import numpy as np

SVD_COMPONENTS = 100  # c-BTM's choice: enough to separate topics, few enough that k-means is not lost in noise
BALANCE_ITERATIONS = 20  # Lloyd steps with balanced assignment after the plain k-means start; stops early


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).digest()


class TopicModel:
    def __init__(self, vectorizer, svd, centroids: np.ndarray, fitted: dict[bytes, int]):
        self.vectorizer, self.svd, self.centroids, self.fitted = vectorizer, svd, centroids, fitted

    def features(self, texts: list[str]) -> np.ndarray:
        x = self.vectorizer.transform(texts)
        x = self.svd.transform(x) if self.svd is not None else x.toarray()
        return _l2_rows(np.asarray(x, np.float64))

    def predict(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.int32)
        labels = np.argmax(self.features(texts) @ self.centroids.T, axis=1).astype(np.int32)
        for i, text in enumerate(texts):
            known = self.fitted.get(_text_key(text))
            if known is not None:
                labels[i] = known
        return labels


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def balanced_assign(similarity: np.ndarray, weights: np.ndarray, slack: float) -> np.ndarray:
    """Each row to a column, best similarity first, no column past (1 + slack) x its equal share of
    the total weight. Greedy over (row, column) pairs in order of similarity; a row too heavy for any
    column's remaining room (a document bigger than the slack) goes to the lightest column."""
    n, k = similarity.shape
    capacity = (1.0 + slack) * weights.sum() / k
    load = np.zeros(k)
    labels = np.full(n, -1, np.int64)
    order = np.argsort(-similarity, axis=None, kind="stable")
    left = n
    for flat in order:
        i, j = divmod(int(flat), k)
        if labels[i] < 0 and load[j] + weights[i] <= capacity:
            labels[i] = j
            load[j] += weights[i]
            left -= 1
            if left == 0:  # the rest of the n x k pairs can change nothing
                break
    for i in np.flatnonzero(labels < 0):
        j = int(np.argmin(load))
        labels[i] = j
        load[j] += weights[i]
    return labels


def fit_topic_model(texts: list[str], num_topics: int, seed: int, max_features: int = 32_768,
                    balance_slack: float | None = 0.1) -> TopicModel:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) < num_topics:
        raise ValueError(
            f"data.partition: expected at least num_partitions={num_topics} training documents to cluster, "
            f"found {len(texts)}"
        )
    vectorizer = TfidfVectorizer(
        max_features=max_features,
        sublinear_tf=True,
        min_df=2 if len(texts) >= 50 else 1,
        max_df=0.9 if len(texts) >= 50 else 1.0,
        stop_words="english",
        token_pattern=r"(?u)\b[^\W\d_][\w]+\b",  # words of 2+ characters, not numbers
        dtype=np.float32,
    )
    matrix = vectorizer.fit_transform(texts)
    components = min(SVD_COMPONENTS, matrix.shape[1] - 1, len(texts) - 1)
    svd = TruncatedSVD(components, random_state=seed) if components >= max(2, num_topics) else None
    x = _l2_rows(np.asarray(svd.fit_transform(matrix) if svd is not None else matrix.toarray(), np.float64))
    kmeans = KMeans(n_clusters=num_topics, random_state=seed, n_init=3, max_iter=100).fit(x)
    centroids = _l2_rows(kmeans.cluster_centers_.astype(np.float64))
    labels = kmeans.labels_.astype(np.int64)
    if balance_slack is not None:
        weights = np.array([max(1, len(t)) for t in texts], np.float64)
        for _ in range(BALANCE_ITERATIONS):
            new = balanced_assign(x @ centroids.T, weights, balance_slack)
            for j in range(num_topics):  # an emptied cluster keeps its centroid
                if (new == j).any():
                    centroids[j] = x[new == j].mean(axis=0)
            centroids = _l2_rows(centroids)
            if np.array_equal(new, labels):
                break
            labels = new
    fitted = {_text_key(t): int(lab) for t, lab in zip(texts, labels)}
    return TopicModel(vectorizer, svd, centroids, fitted)
