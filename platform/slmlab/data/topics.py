"""Topic clusters for expert partitions: TF-IDF + k-means (scikit-learn), deterministic by seed.

The model is fitted on a bounded sample of training documents, given in a fixed order (sorted by
their seeded key), so the same corpus and seed give the same clusters; it then labels every
document inside the Ray tokenizer actors.
"""

from __future__ import annotations

import numpy as np


class TopicModel:
    def __init__(self, vectorizer, kmeans):
        self.vectorizer, self.kmeans = vectorizer, kmeans

    def predict(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.int32)
        return self.kmeans.predict(self.vectorizer.transform(texts)).astype(np.int32)


def fit_topic_model(texts: list[str], num_topics: int, seed: int, max_features: int = 32_768) -> TopicModel:
    from sklearn.cluster import KMeans
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
    kmeans = KMeans(n_clusters=num_topics, random_state=seed, n_init=3, max_iter=100)
    kmeans.fit(matrix)
    return TopicModel(vectorizer, kmeans)
