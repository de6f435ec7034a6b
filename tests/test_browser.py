"""The headless-Chromium harness saves a full-page screenshot: the whole page, not just the window."""
import pytest
from browser import find_browser, render_page
from PIL import Image


@pytest.mark.skipif(find_browser() is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_screenshot_covers_the_whole_page_beyond_the_window(tmp_path):
    page = tmp_path / "tall.html"
    page.write_text("<html><body style='margin:0'><section id='top'><div style='height:3000px;"
                    "background:#08f'></div></section><section id='end'><p>end</p></section></body></html>")
    png = tmp_path / "tall.png"
    state = render_page(page, screenshot=png, screenshot_width=640)
    assert state["sections"] == ["top", "end"] and not state["console_errors"]
    width, height = Image.open(png).size
    assert height > 3000                                      # taller than the 900 px window: beyond the viewport
    assert width <= 640 and Image.open(png).convert("RGB").getpixel((10, 2500)) == (0, 136, 255)
