"""Generate prompts/replay.txt and prompts/eval/retain.txt.

Prompts are built from the hand-written lists below. Every fifth subject of
each list is held out for eval/retain.txt, so the two files differ in content,
not only in wording. Fixed seeds make the output reproducible byte for byte:

    python tools/make_replay_prompts.py
"""

import random
import re
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
REPLAY_COUNT = 2500
EVAL_COUNT = 300
MIN_WORDS, MAX_WORDS = 4, 25

# --- subjects -------------------------------------------------------------

PEOPLE = [
    "a young woman", "a young man", "an elderly woman", "an elderly man",
    "an old man with a gray beard", "a little girl", "a little boy",
    "a teenage girl", "a teenage boy", "a middle-aged woman",
    "a middle-aged man", "a grandmother", "a grandfather", "a young couple",
    "an elderly couple", "a family with two children", "a group of friends",
    "two sisters", "a father and his son", "a mother and her daughter",
    "a woman in a red coat", "a man in a wool sweater",
    "a girl in a yellow raincoat", "a boy in a striped shirt",
    "a woman with curly hair", "a man with round glasses",
    "a college student", "a tourist with a backpack", "a retired teacher",
    "a woman in a denim jacket", "a man in a gray suit",
    "a woman wearing a straw hat", "a bearded man in a flannel shirt",
    "a little girl with braids", "two old friends", "a young father",
    "a woman in a green scarf", "a man in a knitted beanie",
    "a grandmother and her grandson", "a boy with freckles",
]

PEOPLE_ACTIVITIES = [
    "reading a book in a cozy cafe", "drinking coffee by a rainy window",
    "walking a dog through a park", "riding a bicycle along a canal",
    "waiting for a bus at a street corner",
    "holding an umbrella on a busy sidewalk",
    "cooking dinner in a small kitchen", "playing chess on a park bench",
    "carrying groceries up a flight of stairs",
    "taking a photo of the city skyline",
    "writing in a notebook at a wooden desk",
    "playing guitar on a front porch",
    "planting tomatoes in a backyard garden",
    "jogging along a quiet riverside path", "flying a kite on a windy hill",
    "browsing books in an old bookstore", "shopping at a farmers market",
    "feeding ducks at a pond", "sitting on a bench in a train station",
    "painting a picture at an easel", "building a snowman in a front yard",
    "raking leaves in a garden", "hiking up a rocky mountain trail",
    "looking out the window of a train",
    "laughing together at a dinner table", "baking cookies in a bright kitchen",
    "knitting a scarf in an armchair", "watering plants on a balcony",
    "eating noodles at a street food stall",
    "skating at an outdoor ice rink", "sketching in a museum hallway",
    "fishing from a wooden pier", "strolling through a botanical garden",
    "picking strawberries on a farm", "waiting in line at a bakery",
    "playing the piano in a living room",
    "doing a jigsaw puzzle at a kitchen table", "camping beside a lake",
    "crossing a busy street", "sitting on the steps of a library",
    "paddling a canoe on a calm lake",
    "watching the clouds from a rooftop",
    "working on a laptop in a library", "dancing in a living room",
    "reading a newspaper on a park bench",
    "repairing a bicycle in a garage", "walking through a pine forest",
    "riding a scooter through narrow streets",
    "carrying a bouquet of flowers down a street",
    "playing with a puppy on a lawn", "setting up a tent at a campsite",
    "pouring tea in a quiet tea house",
]

PEOPLE_SCENES = [
    "an elderly fisherman mending nets on a wooden dock",
    "a baker pulling fresh bread from an oven",
    "a chef plating a dish in a busy restaurant kitchen",
    "a nurse checking a chart in a hospital hallway",
    "a firefighter standing beside a red fire truck",
    "a carpenter measuring a plank in a workshop",
    "a teacher writing on a chalkboard in a classroom",
    "a farmer driving a tractor across a field",
    "a mail carrier delivering letters on a quiet street",
    "a librarian shelving books in a tall library",
    "an astronaut floating inside a space station",
    "a pilot sitting in a cockpit before takeoff",
    "a scientist looking through a microscope in a lab",
    "a potter shaping clay on a pottery wheel",
    "a blacksmith hammering hot metal on an anvil",
    "a gardener trimming a hedge in a formal garden",
    "a street musician playing violin on a sidewalk",
    "a barista pouring latte art in a coffee shop",
    "a construction worker in a hard hat on a building site",
    "a doctor talking with a patient in a clinic",
    "a tailor sewing a jacket in a small shop",
    "a beekeeper holding a frame of honeycomb",
    "a shepherd leading a flock of sheep down a hill",
    "a mechanic working under a car in a garage",
    "a florist arranging flowers in a flower shop",
    "a photographer setting up a tripod on a cliff",
    "a ballet dancer stretching in a rehearsal studio",
    "a surfer carrying a surfboard across the sand",
    "a mountain climber on a steep rock face",
    "a lighthouse keeper climbing a spiral staircase",
    "a train conductor checking tickets on a train",
    "a veterinarian examining a puppy",
    "a watchmaker repairing a pocket watch at a workbench",
    "a glassblower shaping molten glass",
    "a street vendor selling roasted chestnuts",
    "a fruit seller arranging oranges at a market stall",
    "a cyclist racing down a mountain road",
    "a skateboarder jumping over a curb",
    "a monk sweeping the steps of a temple",
    "a park ranger looking through binoculars",
    "a tour guide leading a group through an old town",
    "a cashier smiling at a grocery store checkout",
    "a crossing guard helping children across a street",
    "an architect studying blueprints at a drafting table",
    "a weaver working at a wooden loom",
    "a cobbler fixing a pair of boots",
    "a bus driver behind the wheel of a city bus",
    "a sailor coiling rope on the deck of a boat",
    "a rice farmer planting seedlings in a flooded paddy",
    "a violinist performing on a small stage",
    "a jazz band playing in a dimly lit club",
    "a choir singing in a stone church",
    "a kindergarten teacher reading to a group of children",
    "a gardener pushing a wheelbarrow full of soil",
    "a bookbinder stitching pages together",
    "a calligrapher writing with a brush and ink",
    "a painter on a ladder painting a wall",
    "a delivery rider on a scooter in heavy traffic",
    "an old woman feeding pigeons in a town square",
    "children playing hopscotch on a sidewalk",
    "a toddler stacking wooden blocks",
    "a boy folding a paper airplane",
    "a girl blowing soap bubbles in a garden",
    "a family having a picnic under a tree",
    "a woodworker carving a wooden spoon",
    "a cheesemaker turning wheels of cheese in a cellar",
]

LAND_ANIMALS = [
    "a red fox", "a white-tailed deer", "a brown bear", "a gray wolf",
    "a wild rabbit", "a chestnut horse", "a dairy cow", "a mountain goat",
    "a golden retriever", "a tabby cat", "a black cat", "a border collie",
    "a lion", "an elephant", "a giraffe", "a zebra", "a hedgehog",
    "a raccoon", "a squirrel", "a moose", "a snow leopard", "a red panda",
    "a koala", "a kangaroo", "a llama", "a pair of lambs", "a badger",
    "a corgi puppy", "a fluffy white kitten", "a tortoise", "a bison",
    "a family of ducks", "a beagle", "an arctic fox", "a donkey",
    "a tiger", "a husky", "a panda", "a chipmunk", "a lynx",
]

LAND_SETTINGS = [
    "in a sunlit meadow", "at the edge of a forest", "on a snowy hillside",
    "beside a quiet river", "in tall golden grass", "on a rocky ledge",
    "among fallen leaves", "in a misty field", "on a mossy log",
    "in a field of wildflowers", "near a wooden fence",
    "on a dusty country road", "under a large oak tree",
    "in a shallow stream", "on a grassy riverbank", "in a pine forest",
    "on a sandy trail", "in front of a red barn",
    "lying on a patch of clover", "walking through fresh snow",
    "resting in the shade of a tree", "looking out from a hollow log",
]

BIRDS = [
    "a red cardinal", "a barn owl", "a blue jay", "a hummingbird",
    "a pair of swans", "a great blue heron", "a bald eagle", "a robin",
    "a flock of geese", "a kingfisher", "a peacock", "a pelican",
    "a sparrow", "a green parrot", "a flamingo", "a woodpecker",
    "a seagull", "a puffin", "a snowy owl", "a pair of lovebirds",
]

BIRD_SETTINGS = [
    "perched on a branch", "sitting on a fence post",
    "flying over a lake", "on a snowy branch", "at a garden bird feeder",
    "among cherry blossoms", "standing in shallow water",
    "on a weathered rooftop", "gliding above the waves",
    "on a mossy stone wall", "in a reed marsh", "on a telephone wire",
    "nesting in a tree hollow", "landing on a pond",
]

ANIMAL_SCENES = [
    "a sea turtle swimming over a coral reef",
    "a humpback whale breaching the ocean surface",
    "a school of silver fish in clear blue water",
    "a pod of dolphins leaping beside a boat",
    "an octopus hiding among rocks on the sea floor",
    "a jellyfish drifting in dark water",
    "a tabby cat sleeping on a sunny windowsill",
    "a dog catching a ball in a backyard",
    "a goldfish swimming in a glass bowl",
    "a frog sitting on a lily pad",
    "a butterfly resting on a purple flower",
    "a honeybee collecting pollen from a sunflower",
    "a snail crawling along a wet leaf",
    "a ladybug on a blade of grass",
    "a group of penguins on an ice floe",
    "a seal lounging on a rocky shore",
    "a crab walking across wet sand",
    "a herd of wild horses running across a plain",
    "a herd of elephants at a watering hole",
    "a dragonfly hovering over a pond",
    "a chameleon clinging to a branch",
    "a pair of otters floating on their backs",
    "a kitten playing with a ball of yarn",
    "a puppy asleep in a wicker basket",
    "a hamster eating a sunflower seed",
    "a flock of sheep grazing on a green hillside",
]

OBJECTS = [
    "a vintage typewriter", "an old film camera", "a ceramic teapot",
    "a brass compass", "an old pocket watch", "a stack of old books",
    "a green glass bottle", "a wicker basket", "a pair of leather boots",
    "a potted cactus", "a red umbrella", "a wooden chair",
    "a brass desk lamp", "an hourglass", "an antique globe",
    "an acoustic guitar", "a pair of reading glasses",
    "a lit candle", "an oil lantern", "a vase of sunflowers",
    "a ceramic coffee mug", "a paper lantern", "a wooden chess set",
    "a fern in a clay pot", "a wind-up toy robot", "a plush toy rabbit",
    "a wooden rocking horse", "a knitted blanket", "a record player",
    "a rotary telephone", "a brass alarm clock", "a leather satchel",
    "a glass terrarium", "a porcelain vase", "a pair of red sneakers",
    "a woven straw hat", "a set of watercolor paints", "a fountain pen",
    "a jar of seashells", "a snow globe", "a wooden toy train",
    "a stack of folded sweaters", "a bouquet of tulips",
    "a copper kettle", "a music box", "a bicycle bell",
    "an old leather suitcase", "a cast iron frying pan",
    "a woven rug", "a spinning top",
]

OBJECT_PLACEMENTS = [
    "on a wooden table", "on a windowsill", "on a bookshelf",
    "on a marble countertop", "in a sunlit room", "on a rustic workbench",
    "against a plain white background", "on a picnic blanket",
    "in an antique shop window", "on a stone step", "on a cluttered desk",
    "on a linen tablecloth", "beside a rainy window",
    "on a shelf in a quiet attic", "on a porch railing",
    "in the corner of a cozy room",
]

FOODS = [
    "a bowl of ramen", "a stack of pancakes with syrup",
    "a slice of chocolate cake", "a loaf of sourdough bread",
    "a plate of sushi", "a bowl of fresh fruit", "a cup of hot cocoa",
    "a basket of croissants", "a pot of vegetable soup", "a cheese pizza",
    "a plate of spaghetti", "a bowl of green salad",
    "three tacos on a plate", "dumplings in a bamboo steamer",
    "a glass of orange juice", "a cup of green tea", "a jar of honey",
    "a bowl of cherries", "a lemon tart", "a tray of cinnamon rolls",
    "a burger with fries", "a bowl of porridge with berries",
    "a stack of waffles", "a tray of roasted vegetables",
    "a platter of cheese and grapes", "a bowl of curry with rice",
    "slices of watermelon", "fried eggs and toast",
    "a plate of colorful macarons", "a pot of tea with two cups",
    "a bowl of popcorn", "two ice cream cones", "a blueberry pie",
    "a bowl of tomato soup", "a plate of grilled fish",
    "a basket of fresh vegetables", "a mug of black coffee",
    "a bowl of pho", "a slice of pepperoni pizza", "a plate of pasta salad",
    "a pile of fresh bagels", "a strawberry milkshake",
    "a bowl of oranges", "a plate of pierogi", "a tray of sugar cookies",
]

FOOD_PLACEMENTS = [
    "on a wooden table", "on a rustic kitchen counter",
    "at a street market", "on a cafe table by the window",
    "on a checkered tablecloth", "on a marble surface",
    "in a sunny kitchen", "on a picnic blanket", "on a restaurant table",
    "on a slate board", "on a breakfast tray", "on a garden table",
]

ROAD_VEHICLES = [
    "a red vintage car", "a yellow school bus", "a vintage motorcycle",
    "a white delivery van", "a bicycle with a wicker basket",
    "a double-decker bus", "a camper van", "a farm tractor",
    "a red fire truck", "a yellow taxi", "a horse-drawn carriage",
    "an old pickup truck", "a blue convertible", "an ice cream truck",
    "a small electric car", "a green scooter", "a city tram",
    "a touring bicycle loaded with bags", "a vintage station wagon",
    "a snowplow", "a cement mixer truck", "a classic sports car",
]

ROAD_SETTINGS = [
    "parked on a cobblestone street", "driving along a coastal road",
    "on an empty desert highway", "on a winding mountain pass",
    "on a rainy city street", "in front of an old diner",
    "on a country road lined with trees", "crossing a stone bridge",
    "parked outside a small bakery", "in a quiet suburban driveway",
    "on a busy downtown avenue", "at a roadside gas station",
]

BOATS = [
    "a wooden sailboat", "a small fishing boat", "a red rowboat",
    "a cargo ship", "a canoe", "a river ferry", "a tall ship with white sails",
    "a houseboat", "a tugboat", "a gondola", "a motor yacht", "a kayak",
]

WATER_SETTINGS = [
    "on a calm lake", "in a busy harbor", "on a misty river",
    "moored at a wooden dock", "on rough gray seas",
    "in a narrow canal", "near a rocky shore", "on a glassy bay",
]

AIRCRAFT = [
    "a hot air balloon", "a small propeller plane", "a passenger jet",
    "a rescue helicopter", "a paper kite", "a seaplane", "a glider",
    "a colorful fleet of hot air balloons", "a blimp",
]

SKY_SETTINGS = [
    "above rolling hills", "over a patchwork of farmland",
    "against a clear blue sky", "above the clouds", "over a mountain range",
    "over a coastal town", "flying low over a lake",
]

RURAL_BUILDINGS = [
    "a wooden cabin", "a thatched cottage", "a lighthouse", "a red barn",
    "a stone farmhouse", "a windmill", "a small chapel",
    "a medieval castle", "a stone bridge", "a treehouse",
    "a mountain hut", "a pagoda", "a watermill", "a ruined abbey",
    "a white farmhouse with a porch", "a greenhouse", "a country inn",
    "a round stone tower",
]

RURAL_SETTINGS = [
    "on a rocky coast", "in a snowy valley", "beside a calm lake",
    "on a grassy hilltop", "at the end of a dirt road",
    "reflected in a still pond", "surrounded by wildflowers",
    "at the edge of a dark forest", "among rolling green hills",
    "in a quiet mountain valley", "next to a winding river",
]

URBAN_BUILDINGS = [
    "a gothic cathedral", "a glass skyscraper", "a victorian house",
    "a modern concrete villa", "a row of colorful townhouses",
    "a domed train station", "an old clock tower", "a brick warehouse",
    "a baroque opera house", "a modern art museum", "a public library",
    "an apartment block with balconies", "a tiled mosque",
    "a small corner shop", "a covered market hall",
    "an old stone town hall", "a suspension bridge",
    "a brutalist office building", "a row of shops with striped awnings",
    "a glass conservatory",
]

URBAN_SETTINGS = [
    "in a busy downtown", "on a quiet side street", "beside a wide river",
    "across a public square", "at the end of a long avenue",
    "overlooking a harbor", "between modern towers", "near a city park",
    "on a hill above the city", "along a tree-lined boulevard",
]

OUTDOOR_PLACES = [
    "a misty pine forest", "a mountain lake surrounded by peaks",
    "rolling green hills with stone walls", "a desert with tall sand dunes",
    "a field of lavender", "a waterfall in a tropical jungle",
    "a rocky coastline with crashing waves", "a quiet village square",
    "a busy open-air market", "a narrow alley with hanging lanterns",
    "a harbor full of fishing boats", "a canal lined with old houses",
    "a sunflower field under a wide sky", "a frozen lake ringed by pines", "a path through a bamboo forest",
    "a vineyard on rolling hills", "a canyon with red rock walls",
    "a glacier between dark mountains", "a smoking volcano above a plain",
    "terraced rice fields on a hillside", "a meadow with wildflowers",
    "a country road lined with poplar trees", "a small fishing village",
    "a suburban street with tidy lawns", "a city skyline across a river",
    "a crowded city intersection", "a quiet side street with parked bicycles",
    "a park with a stone fountain", "a children's playground with a slide",
    "a seaside boardwalk with food stands", "a snowy mountain village",
    "a swamp with cypress trees", "a savanna with acacia trees",
    "an empty beach with palm trees", "a tide pool full of starfish",
    "a mossy stone path through a forest", "a cherry orchard in neat rows",
    "a golden wheat field", "a pond covered in lily pads",
    "a cobblestone street with flower boxes", "a market square with a clock tower",
    "a highway winding through mountains", "a ski slope with a chairlift",
    "a river winding through a valley", "a birch forest with white trunks",
    "a lighthouse on a rocky point", "a coastal cliff path",
    "a botanical garden with a glasshouse", "a rooftop garden in the city",
    "a hillside covered in tea bushes", "a foggy moor with heather",
    "a busy train station platform", "a quiet country churchyard",
    "a row of beach huts", "a windswept prairie with a lone tree", "a riverside promenade with benches",
    "a canyon river seen from above", "an ancient olive grove",
    "a salt flat under a wide sky", "a pumpkin patch beside a farmhouse",
]

INDOOR_PLACES = [
    "a cozy living room with a fireplace", "an empty classroom with wooden desks",
    "a library with tall wooden shelves", "a greenhouse full of ferns",
    "a subway station with tiled walls", "an airport terminal with tall windows", "a laundromat with rows of washing machines",
    "a diner with red booths", "a bakery with shelves of bread",
    "an indoor flower market", "a kitchen with copper pots",
    "an artist's studio full of canvases",
    "a workshop with tools hanging on the wall",
    "a museum hall with dinosaur skeletons", "a quiet reading room",
    "a busy coffee shop", "a small bookstore with a cat",
    "a grand hotel lobby", "a train carriage with wooden seats",
    "a sunlit attic with exposed beams", "a pottery studio with shelves of bowls", "a music room with a grand piano",
    "a vintage record shop", "a farmhouse kitchen with a long table", "a tea room with lace curtains",
    "a science laboratory with glass beakers", "a hallway with tiled floors",
    "a spiral staircase in an old tower", "a crowded food hall",
    "a toy shop full of wooden toys",
]

# --- styles and modifiers ---------------------------------------------------

STYLE_NOUNS = [
    "a watercolor painting", "an oil painting", "a pencil sketch",
    "a charcoal drawing", "a pixel art image", "a 3d render",
    "an ink drawing", "a gouache painting", "a linocut print",
    "a woodblock print", "a pastel drawing", "a colored pencil drawing",
    "a vector illustration", "a children's book illustration",
    "an acrylic painting", "a low poly 3d render", "an isometric illustration",
    "a stained glass window", "a mosaic", "an embroidered patch",
    "a paper cutout collage", "a comic book panel", "an art deco poster",
    "a vintage travel poster", "a photograph", "a black and white photograph",
    "a cross-stitch pattern", "a ballpoint pen sketch",
    "an impressionist painting", "a cubist painting",
    "a minimalist line drawing", "a screen print", "an etching",
    "a fresco", "a chalk drawing", "a miniature diorama", "a tapestry",
    "a storybook illustration", "an anime-style illustration",
    "a ukiyo-e print", "a clay sculpture", "a matte painting",
]

STYLE_TAGS = [
    "watercolor", "oil on canvas", "pixel art", "pencil sketch", "3d render",
    "charcoal on paper", "ink and wash", "gouache", "linocut",
    "flat vector art", "low poly", "isometric view", "impressionist style",
    "art nouveau style", "art deco style", "ukiyo-e style",
    "highly detailed", "soft pastel colors", "studio photograph",
    "35mm film photograph", "analog film, grainy", "matte painting",
    "hyperrealistic", "cel shading", "anime style", "storybook illustration",
    "papercraft", "needle felted", "retro pixel art", "concept art",
    "vibrant colors", "muted earth tones", "fine line art",
    "thick impasto brushstrokes", "retro travel poster",
    "pointillism", "naive folk art", "soft focus photograph",
]

TIMES = [
    "at dawn", "at sunset", "at night", "at dusk", "at noon",
    "in the rain", "in the snow", "in autumn", "in spring", "in winter",
    "in summer", "on a foggy morning", "under a starry sky",
    "at golden hour", "during a thunderstorm", "on a cloudy day",
    "after the rain", "in early morning light", "under a full moon",
    "on a hot summer afternoon", "on a windy day", "at blue hour",
]

LIGHTING = [
    "soft morning light", "warm lamplight", "candlelight", "neon glow",
    "dramatic side lighting", "natural window light", "overcast light",
    "backlit", "moody low light", "bright studio lighting",
    "dappled sunlight", "warm golden light", "cool blue light",
    "rim lighting", "soft diffused light", "harsh midday sun",
]

PHOTO = [
    "35mm photograph", "shot on a 50mm lens", "85mm lens, shallow depth of field",
    "wide angle lens", "f/1.8, bokeh", "long exposure", "macro photograph",
    "telephoto lens", "film photograph, grainy", "high resolution photograph",
    "black and white photograph", "tilt-shift photograph",
    "medium format film photograph", "documentary photograph",
    "candid street photograph", "24mm lens, deep focus",
    "sharp focus, natural light", "instant film photo", "f/8, crisp detail",
    "35mm film, soft grain", "135mm lens, f/2",
]

# --- templates --------------------------------------------------------------
# Fields: {scene} (subject with its detail), {subject}, {style}, {tag},
# {time}, {light}, {photo}.

COMMON_TEMPLATES = [
    "{scene}",
    "{scene}, {tag}",
    "{style} of {scene}",
    "{scene} {time}",
    "{scene} {time}, {photo}",
    "{scene}, {light}, {tag}",
    "{style} of {subject}, {light}",
    "{scene}, {light}, {photo}",
    "{scene} {time}, {tag}, {light}",
]

PEOPLE_TEMPLATES = [
    "portrait of {subject}, {light}, {photo}",
    "candid photo of {scene}",
    "{style} of {scene} {time}",
]

ANIMAL_TEMPLATES = [
    "wildlife photograph of {scene}, telephoto lens",
    "close-up of {subject}, {photo}",
    "{style} of {scene} {time}",
]

OBJECT_TEMPLATES = [
    "still life of {scene}, {tag}",
    "product photo of {subject}, {light}",
    "close-up of {subject}, {photo}",
]

FOOD_TEMPLATES = [
    "overhead shot of {scene}",
    "{scene}, food photography, {light}",
    "close-up of {subject}, {photo}",
]

VEHICLE_TEMPLATES = [
    "side view of {scene}, {photo}",
    "{style} of {scene} {time}",
]

BUILDING_TEMPLATES = [
    "the facade of {scene}, {photo}",
    "looking up at {subject} {time}",
    "{style} of {scene} {time}",
]

OUTDOOR_TEMPLATES = [
    "aerial view of {scene} {time}",
    "wide panorama of {scene}, {photo}",
    "{style} of {scene} {time}",
    "a quiet view of {scene} {time}, {tag}",
]

INDOOR_TEMPLATES = [
    "interior photo of {scene}, {light}, {photo}",
    "{style} of {scene}, {light}",
]

# (subjects, details or None for full phrases, extra templates, weight)
GROUPS = [
    (PEOPLE, PEOPLE_ACTIVITIES, PEOPLE_TEMPLATES, 5),
    (PEOPLE_SCENES, None, PEOPLE_TEMPLATES, 4),
    (LAND_ANIMALS, LAND_SETTINGS, ANIMAL_TEMPLATES, 3),
    (BIRDS, BIRD_SETTINGS, ANIMAL_TEMPLATES, 2),
    (ANIMAL_SCENES, None, ANIMAL_TEMPLATES, 2),
    (OBJECTS, OBJECT_PLACEMENTS, OBJECT_TEMPLATES, 3),
    (FOODS, FOOD_PLACEMENTS, FOOD_TEMPLATES, 3),
    (ROAD_VEHICLES, ROAD_SETTINGS, VEHICLE_TEMPLATES, 2),
    (BOATS, WATER_SETTINGS, VEHICLE_TEMPLATES, 1),
    (AIRCRAFT, SKY_SETTINGS, VEHICLE_TEMPLATES, 1),
    (RURAL_BUILDINGS, RURAL_SETTINGS, BUILDING_TEMPLATES, 2),
    (URBAN_BUILDINGS, URBAN_SETTINGS, BUILDING_TEMPLATES, 2),
    (OUTDOOR_PLACES, None, OUTDOOR_TEMPLATES, 5),
    (INDOOR_PLACES, None, INDOOR_TEMPLATES, 3),
]

# --- forbidden content --------------------------------------------------------

FORBIDDEN = [
    # nudity and sexual content
    "nude", "nudity", "naked", "topless", "erotic", "sexual", "sexy", "nsfw",
    "lingerie", "bikini", "underwear", "breast", "undressed", "seductive",
    "sensual", "swimsuit", "shirtless", "bare", "bath", "shower", "bed",
    # named artists
    "van gogh", "picasso", "monet", "rutkowski", "kinkade", "rembrandt",
    "da vinci", "dali", "warhol", "hokusai", "klimt", "mucha", "vermeer",
    "banksy", "giger", "frazetta", "artgerm", "greg", "ghibli", "miyazaki",
    "bob ross", "basquiat", "kahlo", "hopper", "turner", "cezanne",
    "matisse", "renoir", "munch", "magritte", "escher", "caravaggio",
    "michelangelo", "raphael", "botticelli", "rockwell", "beeple",
    # real people
    "taylor swift", "elon musk", "trump", "obama", "einstein", "emma watson",
    "tom cruise", "brad pitt", "angelina jolie", "marilyn monroe",
    "mona lisa", "queen elizabeth", "beyonce", "kardashian",
    # brands and trademarks
    "disney", "pixar", "marvel", "pokemon", "star wars", "coca-cola",
    "coca cola", "nike", "apple", "lego", "barbie", "mcdonald", "starbucks",
    "ikea", "tesla", "ferrari", "porsche", "bmw", "mercedes", "toyota",
    "kodak", "polaroid", "canon", "nikon", "sony", "leica", "unreal engine",
    "octane", "instagram", "batman", "superman", "mickey", "hello kitty",
    "jeep", "vespa", "frisbee", "claymation", "technicolor", "zamboni",
    # violence and gore
    "blood", "bloody", "gore", "corpse", "gun", "weapon", "kill", "knife",
    "sword", "war", "dead", "murder",
]
FORBIDDEN_RE = re.compile(
    r"\b(?:" + "|".join(map(re.escape, FORBIDDEN)) + r")(?:s|es)?\b", re.IGNORECASE
)
# Reserved for another experiment; also catches "digital", "numbers", ...
RESERVED_RE = re.compile(r"\b(?:digit|number|handwritten)", re.IGNORECASE)


def split_holdout(items):
    """Every fifth item goes to the eval set, the rest to replay."""
    replay = [x for i, x in enumerate(items) if i % 5 != 4]
    held_out = [x for i, x in enumerate(items) if i % 5 == 4]
    return replay, held_out


def make_prompt(rng, subjects, details, extra_templates):
    subject = rng.choice(subjects)
    scene = subject if details is None else f"{subject} {rng.choice(details)}"
    template = rng.choice(COMMON_TEMPLATES + extra_templates)
    return template.format(
        scene=scene,
        subject=subject,
        style=rng.choice(STYLE_NOUNS),
        tag=rng.choice(STYLE_TAGS),
        time=rng.choice(TIMES),
        light=rng.choice(LIGHTING),
        photo=rng.choice(PHOTO),
    )


def generate(rng, groups, count):
    weights = [weight for *_, weight in groups]
    prompts, seen = [], set()
    while len(prompts) < count:
        subjects, details, extra_templates, _ = rng.choices(groups, weights)[0]
        prompt = make_prompt(rng, subjects, details, extra_templates)
        if MIN_WORDS <= len(prompt.split()) <= MAX_WORDS and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def check(prompt):
    words = prompt.split()
    assert MIN_WORDS <= len(words) <= MAX_WORDS, prompt
    assert prompt == prompt.strip() and "\n" not in prompt, prompt
    assert not FORBIDDEN_RE.search(prompt), prompt
    assert not RESERVED_RE.search(prompt), prompt


def main():
    replay_groups, eval_groups = [], []
    for subjects, details, extra_templates, weight in GROUPS:
        assert len(subjects) == len(set(subjects)), subjects
        replay_subjects, eval_subjects = split_holdout(subjects)
        replay_groups.append((replay_subjects, details, extra_templates, weight))
        eval_groups.append((eval_subjects, details, extra_templates, weight))

    replay = generate(random.Random(0), replay_groups, REPLAY_COUNT)
    eval_retain = generate(random.Random(1), eval_groups, EVAL_COUNT)

    for prompt in replay + eval_retain:
        check(prompt)
    assert not set(replay) & set(eval_retain)

    (PROMPTS_DIR / "eval").mkdir(parents=True, exist_ok=True)
    for name, prompts in [("replay.txt", replay), ("eval/retain.txt", eval_retain)]:
        (PROMPTS_DIR / name).write_text("\n".join(prompts) + "\n", encoding="utf-8")
        print(f"wrote {len(prompts)} prompts to {PROMPTS_DIR / name}")


if __name__ == "__main__":
    main()
