"""The NeMo Curator pipeline of the `curate` stage and our own Curator stages.

Pipeline (runs on any Curator executor; `curation.curate` uses RayDataExecutor):

    FilePartitioningStage (Curator) -> DocumentReaderStage (ours: rejects, line numbers, ids)
    -> Modify(UnicodeReformatter NFC, WhitespaceCleaner) -> ScoreFilter x4 (Curator heuristics)

`ExactDedupStage` needs a global view of all documents, so `curation.curate`
runs it on the driver over the concatenated pipeline output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.text.filters import ScoreFilter
from nemo_curator.stages.text.modifiers.modifier import Modify
from nemo_curator.tasks import DocumentBatch, FileGroupTask

from curation.cleaning import WhitespaceCleaner, dedup_key, heuristic_filters, unicode_normalizer
from curation.readers import SUFFIXES, read_file

READ_STEP = "read"
NORMALIZE_STEP = "normalize"
DEDUP_STEP = "exact_dedup"
DOC_COLUMNS = ["id", "text", "source", "file_index", "line"]


@dataclasses.dataclass
class DocumentReaderStage(ProcessingStage[FileGroupTask, DocumentBatch]):
    """Reads JSONL/.txt files into a DocumentBatch; malformed lines go to `_metadata["rejects"]`.

    `files` is the ordered list of all inputs: a document's `file_index` is the
    position of its file there, so the driver can restore input order.
    """

    files: list[str]
    text_field: str = "text"
    id_field: str = "id"
    name: str = READ_STEP

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], DOC_COLUMNS

    def process(self, task: FileGroupTask) -> DocumentBatch:
        """Return the documents of the task's files, with rejects and line counts in `_metadata`."""
        rows: list[dict] = []
        rejects: list[dict] = []
        lines = 0
        for path in task.data:
            result = read_file(path, self.text_field, self.id_field)
            index = self.files.index(str(path))
            rows += [
                {**doc, "file_index": index, "line": int(doc["source"].rsplit(":", 1)[1])}
                for doc in result.docs
            ]
            rejects += result.rejects
            lines += result.lines
        return DocumentBatch(
            dataset_name=task.dataset_name,
            data=pd.DataFrame(rows, columns=DOC_COLUMNS),
            _metadata={"rejects": rejects, "lines": lines},
        )


@dataclasses.dataclass
class ExactDedupStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Keeps the first document of each `dedup_key`; later copies are listed in `_metadata["duplicates"]`.

    Exact only within one batch: give it the whole corpus as one batch.
    """

    text_field: str = "text"
    name: str = DEDUP_STEP

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field, "id"]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field, "id"]

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        """Return the batch without repeated texts, order kept."""
        df = batch.to_pandas()
        keys = df[self.text_field].map(dedup_key)
        first_id = dict(zip(keys[~keys.duplicated()], df["id"][~keys.duplicated()]))
        dup = keys.duplicated(keep="first")
        duplicates = [{"id": i, "duplicate_of": first_id[k]} for i, k in zip(df["id"][dup], keys[dup])]
        return DocumentBatch(
            dataset_name=batch.dataset_name,
            data=df[~dup].reset_index(drop=True),
            _metadata={**batch._metadata, "duplicates": duplicates},
            _stage_perf=batch._stage_perf,
        )


def filter_names(min_words: int, max_symbol_to_word_ratio: float) -> list[str]:
    """Return the names of the heuristic filter steps, in pipeline order."""
    return [f.name for f in heuristic_filters(min_words, max_symbol_to_word_ratio)]


def build_pipeline(
    files: list[Path],
    text_field: str,
    id_field: str,
    min_words: int,
    max_symbol_to_word_ratio: float,
) -> Pipeline:
    """Return the Curator pipeline reading `files` through cleaning and heuristic filters.

    Documents travel in a `text` column whatever `text_field` names in the input.
    """
    paths = [str(f) for f in files]
    stages: list[ProcessingStage] = [
        FilePartitioningStage(file_paths=paths, files_per_partition=1, file_extensions=list(SUFFIXES)),
        DocumentReaderStage(files=paths, text_field=text_field, id_field=id_field),
        Modify([unicode_normalizer(), WhitespaceCleaner()], input_fields="text").with_(name=NORMALIZE_STEP),
    ]
    stages += [ScoreFilter(f, text_field="text") for f in heuristic_filters(min_words, max_symbol_to_word_ratio)]
    return Pipeline(name="aigc-curate", description="read, clean, filter", stages=stages)
