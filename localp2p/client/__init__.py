"""What runs in `localp2p client`: the lite client. It imports nothing from llama.cpp (no
model, no backend): it joins the network and forwards the OpenAI API to its servers."""
