"""loraship.client"""
