"""loraship.cli"""
