"""spicestream.display"""
