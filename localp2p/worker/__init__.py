"""What runs in `localp2p worker …`: the worker's main, its rpc-server child, the tensor cache guard."""
