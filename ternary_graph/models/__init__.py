"""The assembled model and its no-allocation trace."""

from .model import CompositeHead, ModelOutput, TernaryGraphLM, build_model
from .trace import TraceReport, format_trace, trace_model

__all__ = ["CompositeHead", "ModelOutput", "TernaryGraphLM", "TraceReport", "build_model", "format_trace",
           "trace_model"]
