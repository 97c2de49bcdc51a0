"""loraship.triton_repo"""
