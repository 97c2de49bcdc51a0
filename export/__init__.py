"""loraship.export"""
