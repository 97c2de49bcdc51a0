"""loraship.engine"""
