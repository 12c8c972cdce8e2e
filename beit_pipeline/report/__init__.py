"""The HTML report: ``data`` reads a work folder's result files (tolerating missing ones), ``html`` draws them."""
