"""What a person reads of a measured study: pictures, reports and the text tables of analysis results.

It sits above analysis/ (it draws and writes its results, and measures nothing) and below cli/.
"""
