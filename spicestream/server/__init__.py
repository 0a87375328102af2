"""spicestream.server"""
