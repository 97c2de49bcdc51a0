"""loraship.infra"""
