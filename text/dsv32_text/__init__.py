"""dsv32_text: the torch-free text layer shared by the router and the engine.

Tokenizer loading (:mod:`.tokenizer`), the incremental detokenizer with stop
strings (:mod:`.detokenizer`) and the DeepSeek-V3.2 chat encoding and its
parser (:mod:`.encoding`). Nothing here imports torch or any other project
package: the router imports it without importing the engine.
"""
