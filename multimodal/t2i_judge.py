"""Measured text-to-image quality: a classifier trained on the real images scores generated ones.

The judge is a one-hidden-layer MLP (scikit-learn) on pixels over every class of
the caption set, trained on the train split. Prompt accuracy: the share of images
generated from a class's prompt that the judge assigns to that class. FID-like
distance: the Fréchet distance between Gaussians fitted to the judge's
hidden-layer features of two image sets (the FID formula on a small
domain-specific network instead of Inception). Generated images (n per class
prompt) are compared with a real reference of the same class mix and size; the
distance between two disjoint such real sets is the floor at that sample size.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from multimodal.t2i_data import DIGIT_WORDS


def pixels(images: np.ndarray) -> np.ndarray:
    """Return images (N, S, S, 3) in [0, 1] (or uint8 (N, 3, S, S)) as quantised features (N, 3·S·S)."""
    if images.dtype == np.uint8:
        images = images.transpose(0, 2, 3, 1) / 255.0
    return (np.round(np.clip(images, 0, 1) * 255) / 255.0).reshape(len(images), -1)


def fit_judge(images: np.ndarray, labels: np.ndarray, seed: int, hidden: int = 128) -> MLPClassifier:
    """Return an MLP classifier trained on real images (uint8 (N, 3, S, S)) and labels (N,)."""
    judge = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=150, random_state=seed)
    with warnings.catch_warnings():  # stopping at max_iter is the budget, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        judge.fit(pixels(images), labels)
    return judge


def judge_features(judge: MLPClassifier, images: np.ndarray) -> np.ndarray:
    """Return the judge's hidden-layer activations (N, hidden) of images."""
    return np.maximum(pixels(images) @ judge.coefs_[0] + judge.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Return ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between feature sets (Na, D) and (Nb, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σa Σb)^½) = Σ √λ of the symmetric PSD matrix Σa^½ Σb Σa^½ (stable when Σ is singular)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def prompt_accuracy(judge: MLPClassifier, images: np.ndarray, classes: np.ndarray) -> dict[int, float]:
    """Return class -> share of its generated images (N, S, S, 3) that the judge labels as that class."""
    predicted = judge.predict(pixels(images))
    return {int(c): float((predicted[classes == c] == c).mean()) for c in np.unique(classes)}


def balanced_halves(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return two disjoint index sets with min(per_class, count // 2) images of every class each."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(per_class, len(idx) // 2)
        a.append(idx[:k])
        b.append(idx[k: 2 * k])
    return np.concatenate(a), np.concatenate(b)


@dataclasses.dataclass
class Judge:
    """The classifier, the real reference features, and the real-vs-real FID-like floor."""

    classifier: MLPClassifier
    real_test_accuracy: float
    reference: np.ndarray  # judge features of a class-balanced real set
    floor: float


def build_judge(data: dict, per_class: int, seed: int) -> Judge:
    """Return a judge fitted on the train split of a caption set, with a balanced real reference."""
    train, test = data["split"] == 0, data["split"] == 1
    classifier = fit_judge(data["images"][train], data["labels"][train], seed)
    accuracy = float((classifier.predict(pixels(data["images"][test])) == data["labels"][test]).mean())
    ref, other = balanced_halves(data["labels"], per_class, seed)
    reference = judge_features(classifier, data["images"][ref])
    floor = frechet_distance(judge_features(classifier, data["images"][other]), reference)
    return Judge(classifier, accuracy, reference, floor)


def judge_images(judge: Judge, images: np.ndarray, classes: np.ndarray) -> dict:
    """Return digit/shape prompt accuracy, the FID-like distance and per-class accuracy of generated images."""
    acc = prompt_accuracy(judge.classifier, images, classes)
    digits = [a for c, a in acc.items() if c < len(DIGIT_WORDS)]
    shapes = [a for c, a in acc.items() if c >= len(DIGIT_WORDS)]
    return {
        "digit_accuracy": float(np.mean(digits)) if digits else None,
        "shape_accuracy": float(np.mean(shapes)) if shapes else None,
        "fid_like": frechet_distance(judge_features(judge.classifier, images), judge.reference),
        "per_class": acc,
    }
