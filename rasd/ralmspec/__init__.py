"""RaLMSpec: speculative retrieval for iterative retrieval-augmented generation.

- :mod:`rasd.ralmspec.retrievers`: the retriever protocol and real retrievers (faiss exact / HNSW / IVF over
  all-MiniLM-L6-v2 embeddings, BM25 with bm25s), index save/load.
- :mod:`rasd.ralmspec.milvus`: a knowledge base served by Milvus (milvus-lite file, server or cluster).
- :mod:`rasd.ralmspec.corpus`: knowledge bases of ~100-word passages from the packaged real text, questions.
- :mod:`rasd.ralmspec.knnlm`: KNN-LM (hidden state -> next token datastore, interpolated decoding) and its
  speculative version.
- :mod:`rasd.ralmspec.ralm`: the iterative RaLM baseline, RaLMSpec (cache, batched verification, rollback,
  prefetch, OS³, asynchronous verification, KV reuse) and the OS³ scheduler.
"""

from rasd.ralmspec.corpus import passages, questions
from rasd.ralmspec.knnlm import KNNLM, KNNConfig, KNNDatastore, SpeculativeKNNLM
from rasd.ralmspec.milvus import MilvusRetriever
from rasd.ralmspec.ralm import IterativeRaLM, OS3Scheduler, RaLMConfig, RaLMOutput, RaLMSpec, RaLMStats
from rasd.ralmspec.retrievers import BM25Retriever, DenseRetriever, MiniLMEncoder, Retriever, load_retriever

__all__ = [
    "KNNLM",
    "BM25Retriever",
    "DenseRetriever",
    "IterativeRaLM",
    "KNNConfig",
    "KNNDatastore",
    "MilvusRetriever",
    "MiniLMEncoder",
    "OS3Scheduler",
    "RaLMConfig",
    "RaLMOutput",
    "RaLMSpec",
    "RaLMStats",
    "Retriever",
    "SpeculativeKNNLM",
    "load_retriever",
    "passages",
    "questions",
]
