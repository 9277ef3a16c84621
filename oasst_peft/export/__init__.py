"""Export a trained model for llama.cpp and Ollama: one GGUF file and an Ollama Modelfile beside it.

``gguf_model`` (architectures, tensor names and layouts), ``gguf_vocab`` (tokenizer keys),
``modelfile`` (the Ollama Modelfile) and ``writer`` (``export_gguf``, top to bottom).

    from oasst_peft.export import export_gguf
    export_gguf("runs/demo-smollm2", "runs/demo/demo.gguf", qtype="q8_0")
"""

from oasst_peft.export.writer import ExportReport, export_gguf

__all__ = ["ExportReport", "export_gguf"]
