"""spicestream.video"""
