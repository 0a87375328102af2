"""spicestream.testing"""
